"""linkrisk: measure and reduce image-to-report re-linkage risk in
vision-language embeddings of chest radiographs."""

__version__ = "0.1.0"
