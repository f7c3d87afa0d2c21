"""nodeseg: image segmentation with level sets evolved by Neural ODEs."""

__version__ = "0.1.0"
