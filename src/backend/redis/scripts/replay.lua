-- What a connecting client gets before live messages.
-- KEYS: inbox, meta.
-- ARGV: now (ms), max_age (ms), since (an id, '' for none), limit, ttl (ms).
-- With since: every stored message after it; without: the newest `limit`
-- unread ones. Oldest first either way.
-- Returns {unread, resumed (-1 no since, 0 incomplete, 1 complete), head,
--          id1, frame1, id2, frame2, ...}.
local now = tonumber(ARGV[1])
ensure(KEYS[2], now)
redis.call('PEXPIRE', KEYS[2], ARGV[5])
trim(KEYS[1], KEYS[2], now, tonumber(ARGV[2]), nil)
local count = unread(KEYS[1], KEYS[2])
local last = redis.call('HGET', KEYS[2], 'last')
local resumed = -1
local entries = {}
if ARGV[3] ~= '' then
  if lt(ARGV[3], redis.call('HGET', KEYS[2], 'floor')) then resumed = 0 else resumed = 1 end
  -- Nothing is newer than the newest id (and an exclusive range from an
  -- id at the top of the id space is an error).
  if lt(ARGV[3], last) then entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[3], '+') end
elseif tonumber(ARGV[4]) > 0 then
  local rev = redis.call('XREVRANGE', KEYS[1], '+', '(' .. redis.call('HGET', KEYS[2], 'rid'), 'COUNT', ARGV[4])
  for i = #rev, 1, -1 do entries[#entries + 1] = rev[i] end
end
local out = {count, resumed, last}
for _, e in ipairs(entries) do
  out[#out + 1] = e[1]
  out[#out + 1] = e[2][4]
end
return out
