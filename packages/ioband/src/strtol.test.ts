import { test } from "node:test";
import assert from "node:assert/strict";
import { strictStrtol } from "./strtol";

test("strictStrtol follows strict_strtol(s, 0, &v)", () => {
  const ok: [string, number][] = [
    ["0", 0],
    ["10", 10],
    ["010", 8],
    ["0x1f", 31],
    ["0X1F", 31],
    ["-5", -5],
    ["7\n", 7],
    ["32767", 32767],
  ];
  for (const [s, v] of ok) assert.equal(strictStrtol(s), v, JSON.stringify(s));
  for (const s of ["", "-", "+5", " 5", "5 ", "5x", "0x", "08", "1.0", "5\n\n", "99999999999999999999"]) assert.equal(strictStrtol(s), null, JSON.stringify(s));
});
