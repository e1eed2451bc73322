"""Pure tensor math for the rewrite: no torch.fx in here."""
