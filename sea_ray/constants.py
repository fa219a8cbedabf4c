"""Constants shared by data and model code (no imports)."""

IMAGE_TOKEN_INDEX = -200  # sentinel id where a sample's visual tokens are spliced in
IGNORE_INDEX = -100       # label of positions that are never supervised
IMAGE_PLACEHOLDER = "<image>"
