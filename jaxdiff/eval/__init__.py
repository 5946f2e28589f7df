"""Evaluation of generated images: the "shapes" analyzer and scorer (`jaxdiff.eval.shapes`)."""
