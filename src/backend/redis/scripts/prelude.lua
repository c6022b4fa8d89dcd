-- Helpers shared by the inbox scripts (append, replay, unread, mark_read);
-- scripts.rs puts this file in front of each of them.
--
-- parse(id) -> ms, seq; lt(x, y): id x is older than id y; fmt(ms, seq) -> id.
-- trim(inbox, meta, now, max_age, max_len): drops old messages, raises floor.
-- unread(inbox, meta) -> the unread count.
-- ensure(meta, now): creates the meta hash with a creation mark.
local function parse(id) local a, b = string.match(id, '^(%d+)-(%d+)$') return tonumber(a), tonumber(b) end
local function lt(x, y) local a1, b1 = parse(x) local a2, b2 = parse(y) return a1 < a2 or (a1 == a2 and b1 < b2) end
local function fmt(ms, seq) return string.format('%.0f-%.0f', ms, seq) end
-- Drops messages older than max_age and beyond max_len (oldest first), and
-- raises the floor to the newest id dropped: a resume from below the floor
-- is incomplete. (XINFO's max-deleted-entry-id does not count XTRIM.)
-- The age check first reads the oldest entry (cheap): XREVRANGE from an id
-- older than every entry walks the whole stream backwards (measured 69 us
-- per call at a few hundred entries), so it runs only when something is
-- actually too old.
local function trim(inbox, meta, now, max_age, max_len)
  local gone = nil
  local cutoff = fmt(math.max(now - max_age, 0), 0)
  local first = redis.call('XRANGE', inbox, '-', '+', 'COUNT', 1)
  if #first > 0 and lt(first[1][1], cutoff) then
    local old = redis.call('XREVRANGE', inbox, '(' .. cutoff, '-', 'COUNT', 1)
    if #old > 0 then gone = old[1][1] end
  end
  if max_len then
    local k = redis.call('XLEN', inbox) - tonumber(max_len)
    if k > 0 then
      local e = redis.call('XRANGE', inbox, '-', '+', 'COUNT', k)
      local id = e[#e][1]
      if (not gone) or lt(gone, id) then gone = id end
    end
  end
  if gone then
    local ms, seq = parse(gone)
    redis.call('XTRIM', inbox, 'MINID', fmt(ms, seq + 1))
    local floor = redis.call('HGET', meta, 'floor')
    if (not floor) or lt(floor, gone) then redis.call('HSET', meta, 'floor', gone) end
  end
end
local function unread(inbox, meta)
  local seq = tonumber(redis.call('HGET', meta, 'seq') or '0')
  local rn = tonumber(redis.call('HGET', meta, 'rn') or '0')
  local len = redis.call('XLEN', inbox)
  return seq - math.max(rn, seq - len)
end
local function ensure(meta, now)
  if redis.call('EXISTS', meta) == 0 then
    local mark = fmt(now, 0)
    redis.call('HSET', meta, 'floor', mark, 'last', mark, 'seq', 0, 'rn', 0, 'rid', '0-0')
  end
end
