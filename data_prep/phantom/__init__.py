"""The CT phantom generator with exact calcium ground truth (``python -m data_prep.phantom``)."""
