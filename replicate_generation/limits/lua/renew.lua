-- KEYS: leases, released, tickets. ARGV: now, ttl, number of leases, lease ids..., tickets...
local now, n = clock(ARGV[1]), tonumber(ARGV[3])
local expires = now + tonumber(ARGV[2])
for i = 4, 3 + n do
  -- Unless released: re-add if Redis lost it; revive if expired unpurged (grants purge first).
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) or not redis.call('ZSCORE', KEYS[2], ARGV[i]) then
    redis.call('ZADD', KEYS[1], expires, ARGV[i])
  end
end
for i = 4 + n, #ARGV do redis.call('ZADD', KEYS[3], 'XX', expires, ARGV[i]) end
