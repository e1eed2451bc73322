"""Front end of the pass: a model → a captured graph → its attention sites.

``capture`` (torch.export of the model's forward), ``match`` (every attention core found by
dataflow, the site record around it), ``probe`` (the site's weights and RoPE layout, measured by
running pieces of the graph), ``sites`` (all of it for one captured program, with refusals).
"""
