/**
 * A few DOM helpers. Text always goes in as text nodes, never as HTML: nothing a server or a
 * learner typed can become markup.
 */

/**
 * Create an element. `attrs`: `class`, `text`, `hidden`, `on<event>` handlers, `dataset`,
 * boolean and string attributes (false/null/undefined are left out). Children: nodes or strings.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs ?? {})) {
    if (value === false || value === null || value === undefined) continue;
    if (key === 'class') el.className = value;
    else if (key === 'text') el.textContent = value;
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else if (key.startsWith('on') && typeof value === 'function') el.addEventListener(key.slice(2), value);
    else if (value === true) el.setAttribute(key, '');
    else el.setAttribute(key, String(value));
  }
  append(el, ...children);
  return el;
}

const SVG_NS = 'http://www.w3.org/2000/svg';

/**
 * Create an SVG element: every attribute is set as an attribute (`viewBox`, `x`, `height`...),
 * `text` as a text node, `class` as the class. Presentation stays in attributes and the stylesheet,
 * never in a `style` attribute (the page's CSP allows none).
 */
export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs ?? {})) {
    if (value === false || value === null || value === undefined) continue;
    if (key === 'text') el.textContent = value;
    else el.setAttribute(key, String(value));
  }
  append(el, ...children);
  return el;
}

export function append(el, ...children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** Replace all children of `el`. */
export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, ...children);
}

export function byId(id) {
  return document.getElementById(id);
}

/** Show `el` (or hide it with `visible` false). */
export function show(el, visible = true) {
  el.hidden = !visible;
}

/** Save a Blob as a file the learner downloads. */
export function download(blob, filename) {
  const url = URL.createObjectURL(blob);
  const a = h('a', { href: url, download: filename, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}
