"""Package data: DataComp's published tasklist.yml (copied verbatim)."""
