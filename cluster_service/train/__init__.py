"""the epoch loop (Engine) and its drivers: one process (fit), autoencoder mode, the reducer (comm), model export."""
