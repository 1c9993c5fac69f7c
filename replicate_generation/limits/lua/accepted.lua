-- KEYS: rate, op. ARGV: rpm, step, min step, op ttl (ms).
if redis.call('GET', KEYS[2]) then return 0 end  -- a resent call: counted once
local learned = tonumber(redis.call('HGET', KEYS[1], 'learned'))
if learned then
  learned = learned + math.max(tonumber(ARGV[3]), learned * tonumber(ARGV[2]))
  if learned >= tonumber(ARGV[1]) then redis.call('HDEL', KEYS[1], 'learned', 'cut_at')
  else redis.call('HSET', KEYS[1], 'learned', learned) end
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[4])
return 1
