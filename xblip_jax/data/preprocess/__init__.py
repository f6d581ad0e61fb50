"""Host-side (NumPy) preprocessing of raw modality inputs into what the encoders take."""
