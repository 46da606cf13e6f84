"""Built-in recipes, packaged as ``hf_tokplug_recipes`` so that ``tokplug recipes ls|cp`` works from any install."""
