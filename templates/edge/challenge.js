/*
 * Kokoa edge: the visitor pass and the challenge, run by nginx's njs (0.7.9: Debian 12's
 * libnginx-mod-http-js). The same file on every edge; what differs comes from nginx
 * variables: $kokoa_pass_key and $kokoa_health_token (pass-key.conf, secret), $kokoa_origin,
 * $kokoa_mode and $kokoa_difficulty (nginx.conf). Generated; edits are overwritten.
 *
 * A pass:      kokoa_pass=<expiry>.<id>.<mac>, mac = HMAC-SHA256(key, "pass|origin|network|expiry|id")
 * A challenge: <time>.<id>.<bits>.<mac>, mac = HMAC-SHA256(key, "challenge|origin|network|time|id|bits")
 * A solution:  kokoa_solution=<challenge>.<counter>, where SHA-256 of that whole value starts
 *              with <bits> zero bits. It becomes the pass <time + lifetime>.<id>: the same
 *              pass however often it is replayed, so one solution buys one visitor's limits.
 * The network is the client's IPv4 /24: a phone moving within its carrier's block keeps
 * its pass; anywhere else the pass and the challenge are worthless.
 */
import crypto from 'crypto';

const LIFETIME = 86400;        // seconds a pass is good for; renewed while the visitor comes back
const SOLVE_WITHIN = 300;      // seconds a challenge may take to be solved
const ID = /^[0-9a-f]{16}$/;
const NUMBER = /^[0-9]{1,12}$/;

function now() {
    return Math.floor(Date.now() / 1000);
}

function network(r) {
    const address = r.remoteAddress;
    const dot = address.lastIndexOf('.');
    return dot > 0 && address.indexOf(':') < 0 ? address.slice(0, dot) + '.0/24' : address;
}

function mac(r, text) {
    return crypto.createHmac('sha256', r.variables.kokoa_pass_key).update(text).digest('base64url');
}

// Equal strings, in a time that does not depend on where they differ.
function same(a, b) {
    if (typeof a !== 'string' || typeof b !== 'string' || a.length !== b.length) {
        return false;
    }
    let diff = 0;
    for (let i = 0; i < a.length; i++) {
        diff |= a.charCodeAt(i) ^ b.charCodeAt(i);
    }
    return diff === 0;
}

function zeroBits(digest) {
    let bits = 0;
    for (let i = 0; i < digest.length; i++) {
        const byte = digest[i];
        if (byte === 0) {
            bits += 8;
            continue;
        }
        let mask = 0x80;
        while ((byte & mask) === 0) {
            bits++;
            mask >>= 1;
        }
        break;
    }
    return bits;
}

function passMac(r, expiry, id) {
    return mac(r, `pass|${r.variables.kokoa_origin}|${network(r)}|${expiry}|${id}`);
}

function challengeMac(r, time, id, bits) {
    return mac(r, `challenge|${r.variables.kokoa_origin}|${network(r)}|${time}|${id}|${bits}`);
}

// The request's visitor: {from: 'health' | 'cookie' | 'solution' | '', id, expiry}.
function evaluate(r) {
    const t = now();
    const health = r.headersIn['Kokoa-Health'];
    if (health && same(health, r.variables.kokoa_health_token)) {
        return {from: 'health', id: 'health', expiry: 0};
    }
    const cookie = (r.variables.cookie_kokoa_pass || '').split('.');
    if (cookie.length === 3 && NUMBER.test(cookie[0]) && ID.test(cookie[1])) {
        const expiry = Number(cookie[0]);
        if (expiry > t && expiry <= t + LIFETIME && same(cookie[2], passMac(r, cookie[0], cookie[1]))) {
            return {from: 'cookie', id: cookie[1], expiry: expiry};
        }
    }
    const solution = r.variables.cookie_kokoa_solution || '';
    const s = solution.split('.');
    if (s.length === 5 && NUMBER.test(s[0]) && ID.test(s[1]) && /^[0-9]{1,2}$/.test(s[2]) && NUMBER.test(s[4])) {
        const time = Number(s[0]);
        if (time <= t + 5 && t - time <= SOLVE_WITHIN && same(s[3], challengeMac(r, s[0], s[1], s[2]))
                && zeroBits(crypto.createHash('sha256').update(solution).digest()) >= Number(s[2])) {
            return {from: 'solution', id: s[1], expiry: time + LIFETIME};
        }
    }
    return {from: '', id: '', expiry: 0};
}

// Evaluated once per request: nginx asks for $kokoa_pass several times (limits, maps, log).
function visitor(r) {
    const memo = r.variables.kokoa_memo;
    if (memo) {
        const parts = memo.split('|');
        return {from: parts[0], id: parts[1], expiry: Number(parts[2])};
    }
    const found = evaluate(r);
    r.variables.kokoa_memo = `${found.from}|${found.id}|${found.expiry}`;
    return found;
}

// js_set $kokoa_pass: the pass's id, empty without a valid one.
function pass(r) {
    return visitor(r).id;
}

function reachedOrigin(r) {
    return Boolean(r.variables.upstream_status) && Number(r.variables.status) < 500;
}

// js_set $kokoa_pass_cookie: the Set-Cookie of a pass to hand out with this response, if any:
// for a solved challenge; renewed when half its life has passed; and with underAttack: auto,
// to a visitor the origin answered (in normal times, so that they carry it into an attack).
function passCookie(r) {
    const v = visitor(r);
    const t = now();
    let id = v.id;
    let expiry = 0;
    if (v.from === 'solution') {
        expiry = v.expiry;
    } else if (v.from === 'cookie' && v.expiry - t < LIFETIME / 2 && reachedOrigin(r)) {
        expiry = t + LIFETIME;
    } else if (v.from === '' && r.variables.kokoa_mode === 'auto' && r.variables.kokoa_trusted !== '1'
               && reachedOrigin(r)) {
        id = r.variables.request_id.slice(0, 16);
        expiry = t + LIFETIME;
    }
    if (!expiry) {
        return '';
    }
    const value = `${expiry}.${id}.${passMac(r, expiry, id)}`;
    return `kokoa_pass=${value}; Path=/; Max-Age=${expiry - t}; Secure; HttpOnly; SameSite=Lax`;
}

const PAGE_HEAD = '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n' +
    '<meta name="viewport" content="width=device-width, initial-scale=1">\n<meta name="robots" content="noindex">\n' +
    '<title>One moment, please</title>\n<style>\n' +
    'body { font: 1.125rem/1.6 system-ui, sans-serif; max-width: 38rem; margin: 12vh auto; padding: 0 1.25rem;' +
    ' color: #1b1b1b; background: #fff; }\n' +
    'h1 { font-size: 1.6rem; line-height: 1.3; }\n' +
    '@media (prefers-color-scheme: dark) { body { color: #eee; background: #151515; } }\n' +
    '</style>\n</head>\n<body>\n<main>\n<h1>One moment, please</h1>\n' +
    '<p id="status" role="status" aria-live="polite">This site is receiving a flood of automated requests. ' +
    'Your browser is doing a short calculation to show that you are a visitor; the page opens by itself.</p>\n' +
    '<noscript><p><strong>This check needs JavaScript.</strong> Turn JavaScript on for this site and reload ' +
    'the page, or come back in a few minutes.</p></noscript>\n';

// Finds a counter whose SHA-256 (of challenge.counter) starts with `bits` zero bits, in slices
// that keep the page responsive, then sets the solution and loads the page again. Only the
// first 32 bits of the hash are needed (bits <= 24); the edge checks the whole hash. The
// blocks of the challenge that no counter reaches are hashed once (a midstate): each counter
// then costs one compression, with no allocation.
const SOLVER = `
(function () {
  // --- sha256 (bench/challenge_cost.py runs this part alone) ---
  var K = [0x428a2f98,0x71374491,0xb5c0fbcf,0xe9b5dba5,0x3956c25b,0x59f111f1,0x923f82a4,0xab1c5ed5,
    0xd807aa98,0x12835b01,0x243185be,0x550c7dc3,0x72be5d74,0x80deb1fe,0x9bdc06a7,0xc19bf174,
    0xe49b69c1,0xefbe4786,0x0fc19dc6,0x240ca1cc,0x2de92c6f,0x4a7484aa,0x5cb0a9dc,0x76f988da,
    0x983e5152,0xa831c66d,0xb00327c8,0xbf597fc7,0xc6e00bf3,0xd5a79147,0x06ca6351,0x14292967,
    0x27b70a85,0x2e1b2138,0x4d2c6dfc,0x53380d13,0x650a7354,0x766a0abb,0x81c2c92e,0x92722c85,
    0xa2bfe8a1,0xa81a664b,0xc24b8b70,0xc76c51a3,0xd192e819,0xd6990624,0xf40e3585,0x106aa070,
    0x19a4c116,0x1e376c08,0x2748774c,0x34b0bcb5,0x391c0cb3,0x4ed8aa4a,0x5b9cca4f,0x682e6ff3,
    0x748f82ee,0x78a5636f,0x84c87814,0x8cc70208,0x90befffa,0xa4506ceb,0xbef9a3f7,0xc67178f2];
  var W = new Int32Array(64), M = new Int32Array(32);
  function compress(H, offset) {
    var a = H[0], b = H[1], c = H[2], d = H[3], e = H[4], f = H[5], g = H[6], h = H[7], i, t1, t2, x, y;
    for (i = 0; i < 64; i++) {
      if (i < 16) W[i] = M[offset + i];
      else {
        x = W[i - 15]; y = W[i - 2];
        W[i] = (((x >>> 7 | x << 25) ^ (x >>> 18 | x << 14) ^ (x >>> 3)) + W[i - 16] +
                ((y >>> 17 | y << 15) ^ (y >>> 19 | y << 13) ^ (y >>> 10)) + W[i - 7]) | 0;
      }
      t1 = (h + ((e >>> 6 | e << 26) ^ (e >>> 11 | e << 21) ^ (e >>> 25 | e << 7)) + ((e & f) ^ (~e & g)) + K[i] + W[i]) | 0;
      t2 = (((a >>> 2 | a << 30) ^ (a >>> 13 | a << 19) ^ (a >>> 22 | a << 10)) + ((a & b) ^ (a & c) ^ (b & c))) | 0;
      h = g; g = f; f = e; e = (d + t1) | 0; d = c; c = b; b = a; a = (t1 + t2) | 0;
    }
    H[0] = (H[0] + a) | 0; H[1] = (H[1] + b) | 0; H[2] = (H[2] + c) | 0; H[3] = (H[3] + d) | 0;
    H[4] = (H[4] + e) | 0; H[5] = (H[5] + f) | 0; H[6] = (H[6] + g) | 0; H[7] = (H[7] + h) | 0;
  }
  function load(text, from, count) {
    for (var i = 0; i < count; i++) M[i >> 2] |= text.charCodeAt(from + i) << (24 - (i & 3) * 8);
  }
  // first32(counter): the first 32 bits of SHA-256(prefix + counter), as an unsigned number.
  function hasher(prefix) {
    var start = new Int32Array([0x6a09e667,0xbb67ae85,0x3c6ef372,0xa54ff53a,0x510e527f,0x9b05688c,0x1f83d9ab,0x5be0cd19]);
    var H = new Int32Array(8), whole = prefix.length >> 6, tail = prefix.slice(whole * 64), j;
    for (j = 0; j < whole; j++) {
      M.fill(0, 0, 16);
      load(prefix, j * 64, 64);
      compress(start, 0);
    }
    return function first32(counter) {
      var text = tail + counter, n = text.length, blocks = (n + 72) >> 6;
      M.fill(0, 0, blocks * 16);
      load(text, 0, n);
      M[n >> 2] |= 0x80 << (24 - (n & 3) * 8);
      M[blocks * 16 - 1] = (whole * 64 + n) * 8;
      H.set(start);
      for (j = 0; j < blocks; j++) compress(H, j * 16);
      return H[0] >>> 0;
    };
  }
  // --- end sha256 ---
  var status = document.getElementById("status");
  function say(text) { status.textContent = text; }
  if (!navigator.cookieEnabled) {
    say("This check needs cookies. Allow cookies for this site and reload the page.");
    return;
  }
  var tries = Number(sessionStorage.getItem("kokoa-tries") || 0) + 1;
  sessionStorage.setItem("kokoa-tries", String(tries));
  if (tries > 3) {
    sessionStorage.removeItem("kokoa-tries");
    say("The check did not go through (did your network address change?). Reload the page to try again.");
    return;
  }
  var prefix = CHALLENGE + ".", first32 = hasher(prefix), limit = Math.pow(2, 32 - BITS), counter = 0;
  function slice() {
    for (var end = counter + 50000; counter < end; counter++) {
      if (first32(counter) < limit) {
        document.cookie = "kokoa_solution=" + prefix + counter + "; Max-Age=60; Path=/; Secure; SameSite=Lax";
        location.replace(location.href);
        return;
      }
    }
    setTimeout(slice, 0);
  }
  slice();
})();
`;

function page(r) {
    r.variables.kokoa_answer = 'challenge';   // counted as such in the access log's metrics
    const time = String(now());
    const id = r.variables.request_id.slice(0, 16);
    const bits = r.variables.kokoa_difficulty;
    const challenge = `${time}.${id}.${bits}.${challengeMac(r, time, id, bits)}`;
    r.headersOut['Content-Type'] = 'text/html; charset=utf-8';
    r.headersOut['Cache-Control'] = 'no-store';
    r.headersOut['Retry-After'] = '5';
    r.headersOut['Content-Security-Policy'] =
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'";
    r.return(503, `${PAGE_HEAD}<script>\nvar CHALLENGE = "${challenge}", BITS = ${Number(bits)};\n${SOLVER}</script>\n` +
             '</main>\n</body>\n</html>\n');
}

function unavailable(r) {
    r.headersOut['Content-Type'] = 'text/plain; charset=utf-8';
    r.headersOut['Retry-After'] = '1';
    r.return(503, 'The site is busy. Please try again in a moment.\n');
}

// Refused for capacity (by max_conns, which names the upstream group, or by the open
// part of the share, before any upstream), not a tunnel that failed.
function overCapacity(r) {
    const address = r.variables.upstream_addr;
    return !address || address === 'kokoa_origin';
}

function answerBusy(r, challenge) {
    if (!overCapacity(r)) {
        r.return(502);
        return;
    }
    const known = visitor(r).id !== '' || r.variables.kokoa_trusted === '1';
    if (known && r.variables.limit_conn_status === 'REJECTED') {
        // Only the per-visitor connection limit counts a pass holder's requests: a 429.
        r.internalRedirect('@kokoa_limited');
    } else if (known || !challenge) {
        unavailable(r);
    } else {
        page(r);
    }
}

// js_content of `if ($kokoa_open)` (underAttack: on): the challenge page.
function challenge(r) {
    page(r);
}

// js_content of @kokoa_busy: over capacity on a path where visitors may be challenged.
function busy(r) {
    answerBusy(r, true);
}

// js_content of @kokoa_full: over capacity on an exempt path: never a challenge.
function full(r) {
    answerBusy(r, false);
}

export default {pass, passCookie, challenge, busy, full};
