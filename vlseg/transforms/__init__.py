"""Array transforms shared by preprocessing, training and inference."""
