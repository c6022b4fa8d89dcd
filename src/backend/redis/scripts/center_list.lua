-- A page of stored messages with their read state (the message center).
-- KEYS: inbox, meta, rd, ur, del (see prelude.lua).
-- ARGV: now (ms), max_age (ms), cursor (an id, exclusive; '' to start at
--       the newest or oldest end), order ('new' newest first, 'old' oldest
--       first), limit, unread_only ('1' or '0'), topic prefix (as it reads
--       inside a JSON string, without quotes; '' for any), max_scan.
-- Reads at most max_scan entries (the filters may skip some), so a call
-- costs at most the inbox size.
-- Returns {unread, next (the cursor of the next page; '' at the end),
--          id1, read1 (0 or 1), frame1, id2, ...}.
if redis.call('EXISTS', KEYS[2]) == 0 then return {0, ''} end
trim(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), nil)
local out = {unread(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]), ''}
local rn = tonumber(redis.call('HGET', KEYS[2], 'rn') or '0')
local last = redis.call('HGET', KEYS[2], 'last')
local newest = ARGV[4] == 'new'
local limit, unread_only, prefix = tonumber(ARGV[5]), ARGV[6] == '1', ARGV[7]
local max_scan = tonumber(ARGV[8])
local pos = ARGV[3]
local chunk = math.min(math.max(limit, 16), 128)
local scanned, found = 0, 0
while true do
  local e
  if newest then
    if pos == '' then e = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', chunk)
    elseif pos == '0-0' then e = {}
    else e = redis.call('XREVRANGE', KEYS[1], '(' .. pos, '-', 'COUNT', chunk) end
  else
    if pos == '' then e = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', chunk)
    elseif lt(pos, last) then e = redis.call('XRANGE', KEYS[1], '(' .. pos, '+', 'COUNT', chunk)
    else e = {} end
  end
  for _, m in ipairs(e) do
    scanned = scanned + 1
    local frame = m[2][4]
    local ok = true
    if prefix ~= '' then
      -- The topic's JSON text starts right after the id (protocol.rs).
      local at = string.find(frame, '","topic":"', 1, true)
      ok = at ~= nil and string.sub(frame, at + 11, at + 10 + #prefix) == prefix
    end
    if ok then
      local r = is_read(m[1], tonumber(m[2][2]), rn, KEYS[3], KEYS[4])
      if not (unread_only and r) then
        local flag = 0
        if r then flag = 1 end
        out[#out + 1] = m[1]
        out[#out + 1] = flag
        out[#out + 1] = frame
        found = found + 1
        if found >= limit then out[2] = m[1] return out end
      end
    end
    if scanned >= max_scan then out[2] = m[1] return out end
  end
  if #e < chunk then return out end
  pos = e[#e][1]
end
