-- What a connecting client gets before live messages.
-- KEYS: inbox, meta, rd, ur, del (see prelude.lua).
-- ARGV: now (ms), max_age (ms), since (an id, '' for none), limit, ttl (ms).
-- With since: every stored message after it; without: the newest `limit`
-- unread ones (read above the cursor skipped, unread below it included).
-- Oldest first either way.
-- Returns {unread, resumed (-1 no since, 0 incomplete, 1 complete), head,
--          id1, frame1, id2, frame2, ...}.
local now = tonumber(ARGV[1])
ensure(KEYS[2], now)
redis.call('PEXPIRE', KEYS[2], lifetime(ARGV[5]))
trim(KEYS[1], KEYS[2], now, tonumber(ARGV[2]), nil)
local count = unread(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
local last = redis.call('HGET', KEYS[2], 'last')
local resumed = -1
local entries = {}
if ARGV[3] ~= '' then
  if lt(ARGV[3], redis.call('HGET', KEYS[2], 'floor')) then resumed = 0 else resumed = 1 end
  -- Nothing is newer than the newest id (and an exclusive range from an
  -- id at the top of the id space is an error).
  if lt(ARGV[3], last) then entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[3], '+') end
elseif tonumber(ARGV[4]) > 0 then
  local limit = tonumber(ARGV[4])
  local rn = tonumber(redis.call('HGET', KEYS[2], 'rn'))
  -- Above the cursor: enough entries to still hold `limit` unread ones
  -- after skipping those read one by one (in rd).
  local skip = redis.call('ZCOUNT', KEYS[3], '(' .. string.format('%.0f', rn), '+inf')
  local rev = redis.call('XREVRANGE', KEYS[1], '+', '(' .. redis.call('HGET', KEYS[2], 'rid'), 'COUNT', limit + skip)
  local picked = {}
  for _, e in ipairs(rev) do
    if #picked < limit and (skip == 0 or not redis.call('ZSCORE', KEYS[3], e[1])) then picked[#picked + 1] = e end
  end
  -- Then the newest of those marked unread below the cursor (all older).
  if #picked < limit then
    local tn = string.format('%.0f', trimmed(KEYS[1], KEYS[2]))
    local below = redis.call('ZREVRANGEBYSCORE', KEYS[4], '+inf', '(' .. tn, 'LIMIT', 0, limit - #picked)
    for _, id in ipairs(below) do
      local e = entry(KEYS[1], id)
      if e then picked[#picked + 1] = e end
    end
  end
  for i = #picked, 1, -1 do entries[#entries + 1] = picked[i] end
end
local out = {count, resumed, last}
for _, e in ipairs(entries) do
  out[#out + 1] = e[1]
  out[#out + 1] = e[2][4]
end
return out
