// The model-relay page: sign in with an API token, list the workspace's runtimes, ask one
// for its models and wait until the request ends, then pick a model or type one.
//
// Everything the server sends is put in the page with textContent, never as HTML.
'use strict';

const TOKEN_KEY = 'model-relay.api-token';
// A read of a running discovery waits up to WAIT_MS at the server for its status to change
// (the server clamps it to its --max-wait), so the page learns of a change at once. A read
// answered sooner with nothing changed (a server that does not hold reads) is followed by
// the next one no sooner than POLL_MS after it was sent. The runtime list is refreshed
// every REFRESH_MS.
const WAIT_MS = 20000;
const POLL_MS = 1000;
const REFRESH_MS = 10000;
// A poll that fails on the network this many times in a row ends the wait.
const MAX_POLL_FAILURES = 5;
const FAILED_TEXT = 'Could not discover models. Type a model ID or try again.';

const $ = (id) => document.getElementById(id);
const items = new Map(); // runtime id → its list item
let token = null;
let refreshTimer = null;

class SignedOut extends Error {}

// One API call: {status, body}. A 401 signs the user out; a network failure throws.
async function api(method, path) {
  const response = await fetch(path, {
    method,
    headers: { Authorization: 'Bearer ' + token },
    cache: 'no-store',
  });
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (response.status === 401) {
    signOut('That API token was not accepted. Sign in again.');
    throw new SignedOut();
  }
  return { status: response.status, body };
}

function errorOf(answer) {
  return (answer.body && answer.body.error) || 'HTTP ' + answer.status;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ---- signing in and out ----

async function signIn(candidate) {
  token = candidate;
  $('signin-error').textContent = '';
  try {
    const answer = await api('GET', '/api/runtimes');
    if (answer.status !== 200) {
      $('signin-error').textContent = 'Could not list runtimes: ' + errorOf(answer);
      return;
    }
    localStorage.setItem(TOKEN_KEY, candidate);
    $('signin').hidden = true;
    $('workspace').hidden = false;
    showRuntimes(answer.body.runtimes);
    clearInterval(refreshTimer);
    refreshTimer = setInterval(refresh, REFRESH_MS);
    $('refresh').focus();
  } catch (e) {
    if (!(e instanceof SignedOut)) {
      $('signin-error').textContent = 'Could not reach the server: ' + e.message;
    }
  }
}

function signOut(message) {
  token = null;
  localStorage.removeItem(TOKEN_KEY);
  clearInterval(refreshTimer);
  items.clear();
  $('runtimes').replaceChildren();
  $('workspace').hidden = true;
  $('signin').hidden = false;
  $('signin-error').textContent = message || '';
  $('token').value = '';
  $('token').focus();
}

// ---- the runtime list ----

async function refresh() {
  try {
    const answer = await api('GET', '/api/runtimes');
    if (answer.status === 200) {
      showRuntimes(answer.body.runtimes);
    } else {
      $('runtimes-status').textContent = 'Could not list runtimes: ' + errorOf(answer);
    }
  } catch (e) {
    if (!(e instanceof SignedOut)) {
      $('runtimes-status').textContent = 'Could not reach the server: ' + e.message;
    }
  }
}

// Updates the list in place, so a refresh never wipes a discovery or a choice.
function showRuntimes(runtimes) {
  const list = $('runtimes');
  const seen = new Set();
  for (const runtime of runtimes) {
    seen.add(runtime.id);
    let item = items.get(runtime.id);
    if (!item) {
      item = newItem(runtime);
      items.set(runtime.id, item);
    }
    list.appendChild(item); // keeps the server's order
    const badge = item.querySelector('.badge');
    badge.textContent = runtime.status === 'online' ? 'online' : 'offline';
    badge.className = 'badge ' + (runtime.status === 'online' ? 'online' : 'offline');
  }
  for (const [id, item] of items) {
    if (!seen.has(id)) {
      item.remove();
      items.delete(id);
    }
  }
  $('runtimes-status').textContent = runtimes.length === 0
    ? 'No runtimes yet. Create one with POST /api/runtimes and start its daemon.'
    : runtimes.length + (runtimes.length === 1 ? ' runtime' : ' runtimes');
}

function newItem(runtime) {
  const item = $('runtime-template').content.firstElementChild.cloneNode(true);
  item.dataset.runtimeId = runtime.id;
  item.dataset.runtimeName = runtime.name;
  const heading = item.querySelector('.runtime-name');
  heading.textContent = runtime.name;
  item.querySelector('.runtime-provider').textContent = runtime.provider;
  const button = item.querySelector('.discover');
  button.setAttribute('aria-label', 'Discover models for ' + runtime.name);
  button.addEventListener('click', () => discover(runtime.id, item));
  const select = item.querySelector('.model-select');
  const input = item.querySelector('.model-input');
  select.addEventListener('change', () => {
    input.value = select.value;
    showChoice(item);
  });
  input.addEventListener('input', () => showChoice(item));
  return item;
}

function showChoice(item) {
  const id = item.querySelector('.model-input').value.trim();
  item.querySelector('.chosen').textContent = id ? 'Selected model: ' + id : '';
}

// ---- discovery ----

async function discover(runtimeId, item) {
  const button = item.querySelector('.discover');
  // aria-disabled rather than disabled: a disabled button drops keyboard focus.
  if (button.getAttribute('aria-disabled') === 'true') return;
  button.setAttribute('aria-disabled', 'true');
  item.dataset.outcome = 'running';
  setOutcome(item, 'Discovering models…', '');
  try {
    const request = await waitForEnd(runtimeId);
    showOutcome(item, request);
  } catch (e) {
    if (!(e instanceof SignedOut)) showFailure(item, e.message);
  } finally {
    button.removeAttribute('aria-disabled');
  }
}

// Creates a request (or joins the active one) and waits until it has ended, each read held
// at the server until the request's status changes.
async function waitForEnd(runtimeId) {
  const base = '/api/runtimes/' + encodeURIComponent(runtimeId) + '/models';
  const created = await api('POST', base);
  if (created.status !== 200) throw new Error(errorOf(created));
  let request = created.body;
  let failures = 0;
  while (request.status === 'pending' || request.status === 'running') {
    const sent = Date.now();
    let answer;
    try {
      answer = await api('GET', base + '/' + encodeURIComponent(request.id) + '?wait_ms=' + WAIT_MS);
    } catch (e) {
      if (e instanceof SignedOut || ++failures >= MAX_POLL_FAILURES) throw e;
      await sleep(POLL_MS);
      continue;
    }
    failures = 0;
    if (answer.status !== 200) throw new Error(errorOf(answer));
    const unchanged = answer.body.status === request.status;
    request = answer.body;
    const early = POLL_MS - (Date.now() - sent);
    if (unchanged && early > 0) await sleep(early);
  }
  return request;
}

function showOutcome(item, request) {
  const models = request.models || [];
  if (request.status !== 'completed') {
    showFailure(item, request.error || 'the request ended as ' + request.status);
  } else if (models.length === 0) {
    item.dataset.outcome = 'none';
    setOutcome(item, 'No models available',
      request.supported === false
        ? 'This runtime cannot list its models. Type a model ID if you know it.'
        : 'The runtime reported an empty list. Type a model ID if you know it.');
    showPicker(item, []);
  } else {
    item.dataset.outcome = 'found';
    setOutcome(item, 'Found ' + models.length + (models.length === 1 ? ' model.' : ' models.') +
      ' Pick one, or type a model ID.', '');
    showPicker(item, models);
  }
}

function showFailure(item, error) {
  item.dataset.outcome = 'failed';
  setOutcome(item, FAILED_TEXT, 'Server said: ' + error);
  showPicker(item, []);
}

function setOutcome(item, text, detail) {
  item.querySelector('.outcome-text').textContent = text;
  item.querySelector('.outcome-detail').textContent = detail;
}

function showPicker(item, models) {
  const field = item.querySelector('.select-field');
  const select = item.querySelector('.model-select');
  const input = item.querySelector('.model-input');
  select.replaceChildren();
  for (const model of models) {
    const option = document.createElement('option');
    option.value = model.id;
    option.textContent = model.label + (model.default ? ' (default)' : '');
    option.selected = model.default === true;
    select.appendChild(option);
  }
  field.hidden = models.length === 0;
  if (models.length > 0) {
    input.value = select.value;
    select.focus();
  }
  showChoice(item);
}

// ---- start ----

function start() {
  $('signin-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const candidate = $('token').value.trim();
    if (candidate) {
      signIn(candidate);
    } else {
      $('signin-error').textContent = 'Enter an API token.';
    }
  });
  $('signout').addEventListener('click', () => signOut(''));
  $('refresh').addEventListener('click', refresh);

  // A link pasted into an open page changes only the fragment: no reload, so listen.
  window.addEventListener('hashchange', () => {
    const fromUrl = tokenFromUrl();
    if (fromUrl) signIn(fromUrl);
  });
  const saved = tokenFromUrl() || localStorage.getItem(TOKEN_KEY);
  if (saved) {
    signIn(saved);
  } else {
    $('token').focus();
  }
}

// `model-relay demo` links to the page as /#token=…: take the token, then drop it from the
// address bar and the history.
function tokenFromUrl() {
  const fromUrl = new URLSearchParams(location.hash.slice(1)).get('token');
  if (fromUrl) {
    history.replaceState(null, '', location.pathname + location.search);
  }
  return fromUrl;
}

start();
