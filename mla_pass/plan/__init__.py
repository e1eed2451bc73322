"""Per-site choices and the weights they imply.

``calibrate`` (statistics streamed from real activations), ``choose`` (which rotary pairs stay
rotated, the latent width: a ``SitePlan``), ``allocate`` (a total cache budget split between
sites), ``initialise`` (a module's weights from the pretrained projections, by SVD).
"""
