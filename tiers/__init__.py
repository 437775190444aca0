"""Storage tiers: the ``Tier`` protocol, the slot allocator and one module per medium."""
