"""`python -m fmnist_dist` and `accelerate launch -m fmnist_dist` run the CLI."""

from fmnist_dist.cli import main

raise SystemExit(main())
