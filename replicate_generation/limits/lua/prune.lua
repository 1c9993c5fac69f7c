-- KEYS: accounts. ARGV: now, idle seconds, then accounts found inactive.
local idle_since = clock(ARGV[1]) - tonumber(ARGV[2])
for i = 3, #ARGV do
  local seen = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[i]))
  -- Only if not used since: a concurrent use re-marked it and keeps it listed.
  if seen and seen < idle_since then redis.call('ZREM', KEYS[1], ARGV[i]) end
end
