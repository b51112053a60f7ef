"""Front-ends: one per protocol an app speaks to the gateway (today: Tether's own)."""
