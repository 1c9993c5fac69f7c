"""Per-account limits in a store every process shares: SQLite on one host (sqlite), Redis across
hosts (redis, lua/); base holds what both share, heartbeat keeps a process's leases alive."""
