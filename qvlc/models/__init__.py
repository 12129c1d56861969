"""Model families qvlc knows. Everything specific to one family lives in its own sub-package."""
