"""Built-in plugins (importable as ``hf_tokplug_plugins``), each registered through the ``hf_tokplug`` entry-point group."""
