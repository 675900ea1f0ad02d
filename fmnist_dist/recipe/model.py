"""The PyTorch quickstart's MLP, unchanged so that state_dicts move freely between the two."""

from torch import Tensor, nn

NUM_CLASSES = 10
IMAGE_SIZE = 28
# Class names in label order, as in the quickstart.
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class NeuralNetwork(nn.Module):
    """Flatten, then Linear 784→512, ReLU, Linear 512→512, ReLU, Linear 512→10 (the quickstart's model)."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(IMAGE_SIZE * IMAGE_SIZE, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, NUM_CLASSES),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(x)
        logits = self.linear_relu_stack(x)
        return logits
