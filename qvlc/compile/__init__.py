"""`qvlc compile` and `qvlc validate` as a library: the checked plan (``plan``), the stages in order (``stages``),
and the memory estimate checked before any weight is read (``memory_estimate``)."""
