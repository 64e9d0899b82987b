"""Datasets: where images and labels come from (scikit-learn digits, image folders, Hugging Face
datasets on disk, IDX files) and ``fetch``, which brings Fashion-MNIST's files to a folder."""
