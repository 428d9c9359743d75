// @vitest-environment node
/** What the relay serves (index.html and static/) holds no secret and puts no token in a URL. */

import { readFileSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { describe, expect, it } from 'vitest';

const WEB = fileURLToPath(new URL('..', import.meta.url));

function served() {
  const files = [join(WEB, 'index.html')];
  const walk = (dir) => {
    for (const name of readdirSync(dir)) {
      const path = join(dir, name);
      if (statSync(path).isDirectory()) walk(path);
      else files.push(path);
    }
  };
  walk(join(WEB, 'static'));
  return files.map((path) => ({ path, text: readFileSync(path, 'utf8') }));
}

describe('served files', () => {
  it('contain no keys, tokens or credentials', () => {
    const patterns = [/sk-[A-Za-z0-9_-]{16,}/, /eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}/, /OPENAI_API_KEY/, /PARLEY_SECRET_KEY/, /-----BEGIN [A-Z ]*PRIVATE KEY-----/, /AKIA[0-9A-Z]{16}/];
    for (const { path, text } of served()) {
      for (const pattern of patterns) expect(text, `${path} matches ${pattern}`).not.toMatch(pattern);
    }
  });

  it('never put a token in a URL or in localStorage', () => {
    for (const { path, text } of served()) {
      expect(text, path).not.toMatch(/[?&](access_token|token|client_secret)=/);
      expect(text, path).not.toMatch(/localStorage\s*[.[]/);
      expect(text, path).not.toMatch(/document\.cookie/);
    }
  });

  it('loads only same-origin scripts and styles under a strict CSP', () => {
    const index = readFileSync(join(WEB, 'index.html'), 'utf8');
    expect(index).toMatch(/Content-Security-Policy" content="default-src 'none'; script-src 'self';/);
    expect(index).not.toMatch(/<script(?![^>]*src="\/static\/)/);
    expect(index).not.toMatch(/ on[a-z]+="/); // no inline handlers
  });
});
