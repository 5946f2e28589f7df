"""Training data: the procedural captioned "shapes" dataset (`jaxdiff.data.shapes`)."""
