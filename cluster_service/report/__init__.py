"""evaluation (NMI/ARI/ACC) and plots; never imported by training."""
