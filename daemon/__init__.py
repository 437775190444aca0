"""The kvrack daemon: config, control server, sessions, index and tiers' owner."""
