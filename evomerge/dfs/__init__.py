"""Data-flow-space (layer-path) merging, as in Sakana's evolutionary model merge: the search
chooses which layers of which pool models a token passes through, in a fixed cyclic order,
with an input scale at every switch between models. ``path`` decodes genomes (pure),
``model`` runs a path in memory on the live model, ``export`` materialises it."""
