"""The config: a typed, frozen tree (``schema``) read from YAML in qvlc's own layout or vamc's (``loading``,
``vamc``), checked on the YAML alone (``value_checks``, ``weights``, ``cases``) and against the checkpoint's
config.json (``model_checks``), before any weight is read. Every error names the key and the fix."""
