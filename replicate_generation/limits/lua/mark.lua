-- KEYS: accounts. ARGV: now, then accounts.
local now = clock(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now, ARGV[i]) end
