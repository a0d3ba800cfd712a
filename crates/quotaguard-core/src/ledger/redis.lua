-- quotaguard's atomic steps on Redis. One call of this script is one step of one
-- account: KEYS[1] is the account's epoch key, "qg:{tag}:epoch", and every other key
-- the step touches shares its prefix "qg:{tag}:", so that it lives in the same
-- Cluster slot. ARGV[1] names the step, ARGV[2] is the epoch the caller knows,
-- ARGV[3] the caller's time in ms ("" to use the server's TIME, for leases that do not
-- depend on client clocks). The rest are the step's arguments.
--
-- The script decides on token counts and flags only, with the comparisons the Rust
-- ledger makes (ledger::decide_hold, ledger::decide_take): which calls are free, which
-- region, which reason, every price and every threshold are the library's. Money
-- arrives as integer strings and is only stored or added with HINCRBY, which is exact
-- on 64-bit integers (Lua's own numbers are not, past 2^53).

local epoch_key = KEYS[1]
local p = string.sub(epoch_key, 1, #epoch_key - 5)
local op = ARGV[1]
local now
if ARGV[3] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[3])
end
local SEP = '\31'
local DAY = 86400000

-- The epoch: a fresh value at a ledger's birth. A step that finds it missing or
-- changed knows the server lost its data since the caller last looked.
if op == 'hello' then
  local fresh, remembered = ARGV[4], ARGV[5]
  local e = redis.call('GET', epoch_key)
  if not e then
    redis.call('SET', epoch_key, fresh)
    if remembered ~= '' then
      redis.call('SET', p .. 'lost', now)
      return {'LOST', fresh}
    end
    return {'OK', fresh}
  end
  if remembered ~= '' and remembered ~= e then
    return {'LOST', e}
  end
  return {'OK', e}
end
local e = redis.call('GET', epoch_key)
if e ~= ARGV[2] then
  if not e then
    e = 'lost-' .. now
    redis.call('SET', epoch_key, e)
    redis.call('SET', p .. 'lost', now)
  end
  return {'LOST', e}
end

local function num(v)
  if v then return tonumber(v) end
  return 0
end

-- A quota row, or nil. After a loss of data, a model not granted again reads as a
-- zero quota under Free Quota Only: nothing it does is let through as free, and no
-- call that would be charged goes through until it is granted or synced again.
local function quota(model)
  local v = redis.call('HMGET', p .. 'q:' .. model, 'total', 'used', 'act', 'days', 'exp', 'fo', 'cfg')
  if v[1] then
    return {total = tonumber(v[1]), used = tonumber(v[2]), act = tonumber(v[3]),
            days = tonumber(v[4]), exp = tonumber(v[5]), fo = tonumber(v[6]),
            cfg = tonumber(v[7]), real = 1}
  end
  if redis.call('EXISTS', p .. 'lost') == 1 then
    return {total = 0, used = 0, act = 0, days = 0, exp = 0, fo = 1, cfg = 0, real = 2}
  end
  return nil
end

local function quota_reply(q, out)
  if not q then
    table.insert(out, 0)
    for _ = 1, 6 do table.insert(out, 0) end
    return out
  end
  for _, v in ipairs({q.real, q.total, q.used, q.act, q.days, q.fo, q.cfg}) do
    table.insert(out, v)
  end
  return out
end

-- Free tokens held by the model's live reservations (except one). Reservations whose
-- lease ended a day ago are dropped on the way.
local function held(model, except)
  local key = p .. 'res:' .. model
  local all = redis.call('HGETALL', key)
  local sum = 0
  for i = 1, #all, 2 do
    local exp, free = string.match(all[i + 1], '^(%-?%d+),(%d+),')
    exp = tonumber(exp)
    if exp > now and all[i] ~= except then
      sum = sum + tonumber(free)
    elseif exp < now - DAY then
      redis.call('HDEL', key, all[i])
    end
  end
  return sum
end

local function free_left(q, held_tokens, free_region)
  if q and free_region == '1' and q.total > 0 and now < q.exp then
    local left = math.max(q.total - q.used, 0)
    return math.max(left - held_tokens, 0)
  end
  return 0
end

local function bump(hour, model, kind, field, n)
  redis.call('HINCRBY', p .. 'tot:' .. hour, model .. SEP .. kind .. SEP .. field, n)
  redis.call('ZADD', p .. 'hours', hour, hour)
end

-- The commit of a settle: the record, the running totals, the balance and the alerts
-- whose marks the quota's remaining reached. args[i..] is the block the library sends.
local function commit(args, i, left_after)
  local record, hour, model, kind = args[i], args[i + 1], args[i + 2], args[i + 3]
  local inp, out, free, bin, bout = args[i + 4], args[i + 5], args[i + 6], args[i + 7], args[i + 8]
  local cost, currency, n = args[i + 9], args[i + 10], tonumber(args[i + 11])
  redis.call('XADD', p .. 'rec', '*', 'r', record)
  bump(hour, model, kind, 'calls', 1)
  bump(hour, model, kind, 'records', 1)
  bump(hour, model, kind, 'input_tokens', inp)
  bump(hour, model, kind, 'output_tokens', out)
  bump(hour, model, kind, 'free_tokens', free)
  bump(hour, model, kind, 'billable_input', bin)
  bump(hour, model, kind, 'billable_output', bout)
  if cost == '' then
    bump(hour, model, kind, 'unpriced_calls', 1)
  elseif cost ~= '0' then
    bump(hour, model, kind, 'cost', cost)
    local acct = p .. 'acct'
    if redis.call('HEXISTS', acct, 'balance') == 1 then
      if redis.call('HINCRBY', acct, 'balance', '-' .. cost) < 0 then
        redis.call('HSET', acct, 'overdue', 1)
      end
    end
  end
  redis.call('HSET', p .. 'tot:' .. hour, model .. SEP .. kind .. SEP .. 'currency', currency)
  local fired = {}
  for j = 0, n - 1 do
    local key = args[i + 12 + 3 * j]
    local lo, hi = tonumber(args[i + 13 + 3 * j]), tonumber(args[i + 14 + 3 * j])
    if left_after >= lo and left_after <= hi
        and redis.call('HSETNX', p .. 'alerts', key, now) == 1 then
      table.insert(fired, key)
    end
  end
  return fired
end

if op == 'reserve' then
  -- model, id, kind, thinking, input, worst, free_region, covered, may_pay, lease, hour
  local model, id, kind = ARGV[4], ARGV[5], ARGV[6]
  local worst = tonumber(ARGV[9])
  local q = quota(model)
  local h = held(model, nil)
  local overdue = num(redis.call('HGET', p .. 'acct', 'overdue'))
  local blocked = redis.call('EXISTS', p .. 'blocked')
  local part = nil
  if overdue == 0 and blocked == 0 then
    local avail = free_left(q, h, ARGV[10])
    if ARGV[11] == '1' and worst <= avail then
      part = worst
    elseif ARGV[12] == '1' and not (q and q.fo == 1) then
      if ARGV[11] == '1' then part = avail else part = 0 end
    end
  end
  if not part then
    bump(ARGV[14], model, kind, 'refusals', 1)
    return quota_reply(q, {'REFUSED', h, overdue, blocked})
  end
  local exp = now + tonumber(ARGV[13])
  redis.call('HSET', p .. 'res:' .. model, id,
    exp .. ',' .. part .. ',' .. worst .. ',' .. now .. ',' .. ARGV[8] .. ',' .. kind .. ',' .. ARGV[7])
  return quota_reply(q, {'HELD', part, now, exp})
end

if op == 'take' then
  -- model, reservation ('' for none), record id, input, output, free_region, covered,
  -- predicted free ('' for no prediction), expected total (-1: no quota), expected
  -- activation, the pending payload, then the commit block.
  local model, rid, recid = ARGV[4], ARGV[5], ARGV[6]
  local inp, out = tonumber(ARGV[7]), tonumber(ARGV[8])
  local settled = p .. 'settled'
  if redis.call('ZSCORE', settled, recid) then
    local pending = redis.call('HGET', p .. 'pending', recid)
    if pending then return {'PENDING', pending} end
    return {'DONE'}
  end
  local overrun, expired = false, false
  if rid ~= '' then
    local key = p .. 'res:' .. model
    local v = redis.call('HGET', key, rid)
    if v then
      local exp, _, worst = string.match(v, '^(%-?%d+),(%d+),(%d+),')
      expired = tonumber(exp) <= now
      overrun = inp + out > tonumber(worst)
      redis.call('HDEL', key, rid)
    else
      -- Swept after its lease: the usage is still recorded.
      expired, overrun = true, true
    end
  end
  local q = quota(model)
  local others = 0
  if not overrun then others = held(model, nil) end
  local free = 0
  if ARGV[10] == '1' then free = math.min(free_left(q, others, ARGV[9]), inp + out) end
  if q and q.real == 1 and free > 0 then
    redis.call('HINCRBY', p .. 'q:' .. model, 'used', free)
    q.used = q.used + free
  end
  redis.call('ZADD', settled, now, recid)
  redis.call('ZREMRANGEBYSCORE', settled, '-inf', now - 7 * DAY)
  local left_after = 0
  if q then left_after = math.max(q.total - q.used, 0) end
  local expect_total = tonumber(ARGV[12])
  local as_predicted = ARGV[11] ~= '' and tonumber(ARGV[11]) == free and not expired
  if as_predicted then
    if q and q.real == 1 then
      as_predicted = expect_total == q.total and tonumber(ARGV[13]) == q.act
    else
      as_predicted = expect_total == -1
    end
  end
  if as_predicted and (not q or now < q.exp) then
    local fired = commit(ARGV, 15, left_after)
    return {'COMMITTED', left_after, unpack(fired)}
  end
  -- Not as the library predicted: the token split stands, marked pending in this same
  -- step; the library prices it and commits, or a recovery does if it crashes first.
  redis.call('HSET', p .. 'pending', recid, ARGV[14] .. SEP .. free .. SEP .. (expired and 1 or 0))
  redis.call('ZADD', p .. 'pending_at', now, recid)
  local r = {'TAKEN', free, expired and 1 or 0, now}
  return quota_reply(q, r)
end

if op == 'commit' then
  local recid = ARGV[4]
  if redis.call('HDEL', p .. 'pending', recid) == 0 then
    return {'DONE'}
  end
  redis.call('ZREM', p .. 'pending_at', recid)
  local q = quota(ARGV[7])
  local left_after = 0
  if q then left_after = math.max(q.total - q.used, 0) end
  if q and now >= q.exp then left_after = math.huge end
  local fired = commit(ARGV, 5, left_after)
  return {'COMMITTED', left_after, unpack(fired)}
end

if op == 'pending' then
  -- Settles left half-way longer than ARGV[4] ms ago.
  local ids = redis.call('ZRANGEBYSCORE', p .. 'pending_at', '-inf', now - tonumber(ARGV[4]))
  local out = {'PENDING'}
  for _, id in ipairs(ids) do
    local v = redis.call('HGET', p .. 'pending', id)
    if v then table.insert(out, v) else redis.call('ZREM', p .. 'pending_at', id) end
  end
  return out
end

if op == 'release' then
  -- model, id, failed, hour
  local key = p .. 'res:' .. ARGV[4]
  local v = redis.call('HGET', key, ARGV[5])
  if not v then return {'UNKNOWN'} end
  redis.call('HDEL', key, ARGV[5])
  if ARGV[6] == '1' then
    local kind = string.match(v, '^%-?%d+,%d+,%d+,%-?%d+,%d+,(%a+),')
    bump(ARGV[7], ARGV[4], kind, 'failures', 1)
  end
  return {'RELEASED'}
end

if op == 'grant' then
  -- model, total, activated, days, expires: granting again keeps what was used.
  local key = p .. 'q:' .. ARGV[4]
  local used = num(redis.call('HGET', key, 'used'))
  local fo = num(redis.call('HGET', key, 'fo'))
  local cfg = num(redis.call('HGET', key, 'cfg'))
  redis.call('HSET', key, 'total', ARGV[5], 'used', used, 'act', ARGV[6], 'days', ARGV[7],
    'exp', ARGV[8], 'fo', fo, 'cfg', cfg)
  redis.call('SADD', p .. 'models', ARGV[4])
  return quota_reply(quota(ARGV[4]), {'OK'})
end

if op == 'reconcile' then
  -- model, then "force" or "lower" with total and used, or "deplete"; a missing row is created from the
  -- defaults the library sends (activated, days, expires).
  local model = ARGV[4]
  local key = p .. 'q:' .. model
  if redis.call('EXISTS', key) == 0 then
    redis.call('HSET', key, 'total', 0, 'used', 0, 'act', ARGV[8], 'days', ARGV[9],
      'exp', ARGV[10], 'fo', 0, 'cfg', 0)
    redis.call('SADD', p .. 'models', model)
  end
  local before = num(redis.call('HGET', key, 'used'))
  if ARGV[5] == 'force' then
    redis.call('HSET', key, 'total', ARGV[6], 'used', ARGV[7])
  elseif ARGV[5] == 'lower' then
    -- used only grows: a lagging console figure never gives tokens back
    local used = math.max(before, tonumber(ARGV[7]))
    redis.call('HSET', key, 'total', ARGV[6], 'used', used)
  else
    redis.call('HSET', key, 'used', redis.call('HGET', key, 'total'))
  end
  -- What reconciliation put into used, for a check to tell it from a lost record.
  local after = num(redis.call('HGET', key, 'used'))
  if after ~= before then redis.call('HINCRBY', key, 'adj', after - before) end
  return quota_reply(quota(model), {'OK'})
end

if op == 'inspect' then
  -- Everything a check of the ledger reads, in one step: a consistent snapshot of the
  -- account. Each model with its quota row and its reservations, each hour with its
  -- totals, every record, the settles half-way, the compaction point.
  local models = {}
  for _, m in ipairs(redis.call('SMEMBERS', p .. 'models')) do
    table.insert(models, {m, redis.call('HGETALL', p .. 'q:' .. m),
      redis.call('HGETALL', p .. 'res:' .. m)})
  end
  local hours = {}
  for _, h in ipairs(redis.call('ZRANGE', p .. 'hours', 0, -1)) do
    table.insert(hours, {h, redis.call('HGETALL', p .. 'tot:' .. h)})
  end
  return {'INSPECT', models, hours, redis.call('XRANGE', p .. 'rec', '-', '+'),
    redis.call('HGETALL', p .. 'pending'), redis.call('GET', p .. 'compacted') or ''}
end

if op == 'free_only' then
  -- enable, then the models the library allowed
  local out = {'OK'}
  for i = 5, #ARGV do
    local key = p .. 'q:' .. ARGV[i]
    if redis.call('EXISTS', key) == 1 then
      redis.call('HSET', key, 'fo', ARGV[4], 'cfg', 1)
      table.insert(out, ARGV[i])
    end
  end
  return out
end

if op == 'account' then
  -- "set" balance overdue | "top_up" amount | "overdue"
  local key = p .. 'acct'
  if ARGV[4] == 'set' then
    redis.call('HSET', key, 'balance', ARGV[5], 'overdue', ARGV[6])
  elseif ARGV[4] == 'top_up' then
    if redis.call('HINCRBY', key, 'balance', ARGV[5]) >= 0 then
      redis.call('HSET', key, 'overdue', 0)
    end
  elseif ARGV[4] == 'overdue' then
    redis.call('HSET', key, 'overdue', 1)
  end
  local v = redis.call('HMGET', key, 'balance', 'overdue')
  return {'OK', v[1] or '', num(v[2])}
end

if op == 'block' then
  -- the kill switch: a reason turns it on, "" off
  if ARGV[4] == '' then
    redis.call('DEL', p .. 'blocked')
  else
    redis.call('SET', p .. 'blocked', ARGV[4])
  end
  return {'OK'}
end

if op == 'blocked' then
  local v = redis.call('GET', p .. 'blocked')
  if v then return {'OK', v} end
  return {'OK'}
end

if op == 'fire' then
  local out = {'OK'}
  for i = 4, #ARGV do
    table.insert(out, redis.call('HSETNX', p .. 'alerts', ARGV[i], now))
  end
  return out
end

if op == 'quota' then
  -- the models named, or every model with ARGV[4] == "*"
  local models
  if ARGV[4] == '*' then
    models = redis.call('SMEMBERS', p .. 'models')
    table.sort(models)
  else
    models = {ARGV[4]}
  end
  local out = {'OK', now}
  for _, m in ipairs(models) do
    local q = quota(m)
    if q and q.real == 1 then
      table.insert(out, m)
      table.insert(out, held(m, nil))
      quota_reply(q, out)
    end
  end
  return out
end

return redis.error_reply('quotaguard: unknown step ' .. tostring(op))
