"""The artifact contract: file layout, graph signatures, the specs a runtime reads, manifest.json (typed, bounded,
hashed), staging/lock/publish, and whether a folder can be trusted. Knows no model family."""
