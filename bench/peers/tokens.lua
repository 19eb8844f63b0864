-- wrk script for `make bench-peers`: every request carries the next token of a file of
-- distinct JWTs (one a line), so no token repeats and no verified-token cache can hit.
-- Arguments (after `--`): FILE START THREADS. Thread t (1..THREADS) sends the tokens
-- START+t-1, START+t-1+THREADS, ... of the file (0-based, wrapping at its end); at the end
-- the script prints "tokens sent N of M" for the bench to check N <= M.
local threads = {}
local counter = 0

function setup(thread)
   counter = counter + 1
   thread:set("tid", counter)
   table.insert(threads, thread)
end

function init(args)
   local path, start, nthreads = args[1], tonumber(args[2]), tonumber(args[3])
   tokens = {}
   for line in io.lines(path) do
      tokens[#tokens + 1] = line
   end
   total = #tokens
   pos = start + tid - 1
   step = nthreads
   sent = 0
   headers = {}
   for k, v in pairs(wrk.headers) do
      headers[k] = v
   end
end

function request()
   headers["Authorization"] = "Bearer " .. tokens[(pos % total) + 1]
   pos = pos + step
   sent = sent + 1
   return wrk.format(nil, nil, headers)
end

function done(summary, latency, requests)
   local n, m = 0, 0
   for _, t in ipairs(threads) do
      n = n + t:get("sent")
      m = t:get("total")
   end
   io.write(string.format("tokens sent %d of %d\n", n, m))
end
