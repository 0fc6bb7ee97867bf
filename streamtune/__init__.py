"""streamtune: stream multimodal data from object storage into MLX fine-tuning."""

from streamtune.accel import preload_blas

preload_blas()

__version__ = "0.1.0"

__all__ = ["CloudStreamingDataset", "__version__"]


def __getattr__(name: str):
    if name == "CloudStreamingDataset":
        from streamtune.stream.dataset import CloudStreamingDataset

        return CloudStreamingDataset
    raise AttributeError(name)
