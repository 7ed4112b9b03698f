"""Container image of the downstairs: ``python -m sut.storage.image ensure`` prints its tag."""

from sut.storage.image.build import (
    IMAGE_LABEL,
    PROGRAMS,
    ImageBuildError,
    binary_image_tag,
    ensure_binary_image,
    ensure_image,
    image_tag,
)

__all__ = ["IMAGE_LABEL", "PROGRAMS", "ImageBuildError", "binary_image_tag", "ensure_binary_image",
           "ensure_image", "image_tag"]
