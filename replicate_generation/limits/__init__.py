"""Per-account limits in a store every process shares: SQLite on one host (sqlite), Redis across
hosts (redis, lua/, on redis_client: one server or a Redis Cluster); base holds what both share,
heartbeat keeps a process's leases alive."""
