"""rawvm's image catalog: which machine image to boot (EC2 public parameters, the local VM image recipe)."""

__version__ = "0.1.0"
