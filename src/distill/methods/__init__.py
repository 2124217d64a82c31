"""Method plugins, by family (methods/lm/, ...). The interface lives in `base`; a family module imports
its methods, which registers them (importing this package alone loads no model library)."""
