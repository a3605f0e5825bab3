// Integer parsing with the kernel's rules, because the control language must accept
// and reject exactly what blkio.devices / blkio.settings accept (seed 001 parses every
// value with strict_strtol(value, 0, &val) or simple_strtol(value, &endp, 0)).

/** Kernel errno values returned (negated) by the ported functions. */
export const EINVAL = 22;
export const ENODEV = 19;
export const EACCES = 13;
export const ENXIO = 6;
export const EBUSY = 16;
export const EEXIST = 17;
export const ENOENT = 2;

export const SHORT_MAX = 32767;
export const INT_MAX = 2147483647;

interface ParsedUlong {
  value: number;
  /** Index of the first character not consumed (simple_strtoul's *endp). */
  end: number;
}

function digitValue(c: number): number {
  if (c >= 48 && c <= 57) return c - 48; // 0-9
  if (c >= 97 && c <= 102) return c - 87; // a-f
  if (c >= 65 && c <= 70) return c - 55; // A-F
  return 99;
}

/**
 * simple_strtoul(cp, &endp, 0): base 0 picks 16 for "0x" (followed by a hex digit),
 * 8 for a leading "0", else 10. Unlike 2.6.31 we do not let the value wrap: a value
 * beyond Number.MAX_SAFE_INTEGER is reported as NaN (callers treat it as -EINVAL).
 */
function simpleStrtoul(s: string, start: number): ParsedUlong {
  let i = start;
  let base = 10;
  if (s.charCodeAt(i) === 48 /* '0' */) {
    base = 8;
    i++;
    const x = s.charCodeAt(i);
    if ((x === 120 || x === 88) && digitValue(s.charCodeAt(i + 1)) < 16) {
      base = 16;
      i++;
    }
  }
  let value = 0;
  const digitsStart = i;
  for (; i < s.length; i++) {
    const d = digitValue(s.charCodeAt(i));
    if (d >= base) break;
    value = value * base + d;
  }
  // A lone "0" consumed its digit while choosing the base.
  if (i === digitsStart && base === 8) return { value: 0, end: i };
  if (value > Number.MAX_SAFE_INTEGER) value = Number.NaN;
  return { value, end: i };
}

/**
 * strict_strtol(value, 0, &val) of 2.6.31: an optional '-', then digits in base 0,
 * then nothing (or a single trailing '\n'). '+' and whitespace are rejected.
 * Returns null where the kernel returns -EINVAL.
 */
export function strictStrtol(s: string): number | null {
  let start = 0;
  let neg = false;
  if (s.charCodeAt(0) === 45 /* '-' */) {
    neg = true;
    start = 1;
  }
  if (s.length === start) return null;
  const r = simpleStrtoul(s, start);
  if (r.end === start || Number.isNaN(r.value)) return null;
  if (r.end !== s.length && !(r.end === s.length - 1 && s[r.end] === "\n")) return null;
  return neg ? -r.value : r.value;
}

/**
 * simple_strtol(value, &endp, 0): as many digits as match; returns the value and the
 * end index. No digits at all gives end === start (the caller decides whether that is
 * an error; the seed's range-bw parser does not check, we do).
 */
export function simpleStrtol(s: string, start: number): ParsedUlong {
  if (s.charCodeAt(start) === 45 /* '-' */) {
    const r = simpleStrtoul(s, start + 1);
    if (r.end === start + 1) return { value: 0, end: start };
    return { value: -r.value, end: r.end };
  }
  return simpleStrtoul(s, start);
}
