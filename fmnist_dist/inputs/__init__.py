"""What users hand in: FashionMNIST's IDX files and their checks, synthetic data, image files to predict."""
