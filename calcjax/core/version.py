"""calcjax's version: the one definition (``calcjax.__version__``, the DICOM outputs' software version)."""

VERSION = "0.1.0"
