"""The offline PSM pipeline: stage runners (1-3, 5) writing label files, and prediction of the final network."""
