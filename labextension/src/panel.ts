/**
 * The "LoRA" sidebar: renders a `LoraModel` and forwards the two actions
 * (Stop, switch adapter) back to it.
 *
 * Plain DOM, built once and updated in place: the state arrives up to four
 * times a second during training, and rebuilding the adapter <select> each
 * time would close it under the user's pointer. Text from the kernel only
 * ever goes through `textContent`.
 */

import { LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import { connectionMessage } from './messages';
import { LoraModel } from './model';
import { sparkline } from './sparkline';
import { IRunInfo, ISessionState, activeAdapter, formatDuration } from './state';

const LORA_SVG = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <rect x="3" y="4" width="4" height="16" rx="1"/>
    <rect x="10" y="9" width="4" height="6" rx="1"/>
    <rect x="17" y="4" width="4" height="16" rx="1"/>
    <rect x="7" y="11" width="3" height="2"/>
    <rect x="14" y="11" width="3" height="2"/>
  </g>
</svg>`;

export const loraIcon = new LabIcon({ name: 'ipylora:lora', svgstr: LORA_SVG });

const SPARK_W = 220;
const SPARK_H = 48;
const SVG_NS = 'http://www.w3.org/2000/svg';

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className: string,
  text?: string
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  node.className = className;
  if (text !== undefined) {
    node.textContent = text;
  }
  return node;
}

export class LoraPanel extends Widget {
  constructor(model: LoraModel) {
    super();
    this._model = model;
    this.id = 'ipylora-sidebar';
    this.addClass('jp-ipylora-panel');
    this.title.icon = loraIcon;
    this.title.caption = 'LoRA';

    const root = this.node;
    root.appendChild(el('h2', 'jp-ipylora-title', 'LoRA'));
    this._notebook = root.appendChild(el('div', 'jp-ipylora-notebook'));
    this._message = root.appendChild(el('div', 'jp-ipylora-message'));
    this._error = root.appendChild(el('div', 'jp-ipylora-error'));
    this._error.setAttribute('role', 'alert');
    this._body = root.appendChild(el('div', 'jp-ipylora-body'));

    this._modelSection = this._section('Model');
    this._datasetSection = this._section('Datasets');
    const adapters = this._section('Adapters');
    this._adapterSelect = el('select', 'jp-mod-styled jp-ipylora-adapter-select');
    this._adapterSelect.title = 'Adapter used by chat and generation';
    this._adapterSelect.addEventListener('change', () => {
      this._model.setAdapter(this._adapterSelect.value);
    });
    adapters.appendChild(this._adapterSelect);
    this._adapterList = adapters.appendChild(el('ul', 'jp-ipylora-list'));

    const run = this._section('Run');
    this._runSection = run;
    this._runName = run.appendChild(el('div', 'jp-ipylora-run-name'));
    this._progress = el('progress', 'jp-ipylora-progress');
    run.appendChild(this._progress);
    this._runStats = run.appendChild(el('div', 'jp-ipylora-run-stats'));
    this._spark = document.createElementNS(SVG_NS, 'svg');
    this._spark.setAttribute('class', 'jp-ipylora-sparkline');
    this._spark.setAttribute('width', String(SPARK_W));
    this._spark.setAttribute('height', String(SPARK_H));
    this._spark.setAttribute('viewBox', `0 0 ${SPARK_W} ${SPARK_H}`);
    this._sparkPath = document.createElementNS(SVG_NS, 'path');
    this._spark.appendChild(this._sparkPath);
    run.appendChild(this._spark);
    this._lossLabel = run.appendChild(el('div', 'jp-ipylora-loss'));
    this._stop = el('button', 'jp-mod-styled jp-mod-warn jp-ipylora-stop', 'Stop');
    this._stop.addEventListener('click', () => {
      this._stopping = true;
      this._stop.disabled = true;
      this._stop.textContent = 'Stopping…';
      this._model.stop();
    });
    run.appendChild(this._stop);

    model.changed.connect(this._render, this);
    this._render();
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._model.changed.disconnect(this._render, this);
    super.dispose();
  }

  private _section(title: string): HTMLElement {
    const section = this._body.appendChild(el('section', 'jp-ipylora-section'));
    section.dataset.section = title.toLowerCase();
    section.appendChild(el('h3', 'jp-ipylora-section-title', title));
    return section;
  }

  private _render(): void {
    const model = this._model;
    const connection = model.connection;
    this.node.dataset.connection = connection.kind;
    this._notebook.textContent = model.label;
    const message = connectionMessage(connection);
    this._message.textContent = message ?? '';
    this._message.hidden = message === null;
    this._error.textContent = model.error ?? '';
    this._error.hidden = model.error === null;
    this._body.hidden = connection.kind !== 'ready';
    if (connection.kind === 'ready') {
      this._renderState(connection.state);
    }
  }

  private _renderState(state: ISessionState): void {
    this._renderModel(state);
    this._renderDatasets(state);
    this._renderAdapters(state);
    this._renderRun(state.run);
  }

  private _renderModel(state: ISessionState): void {
    const section = this._modelSection;
    section.querySelector('.jp-ipylora-content')?.remove();
    const content = section.appendChild(el('div', 'jp-ipylora-content'));
    const m = state.model;
    if (m === null) {
      content.appendChild(el('div', 'jp-ipylora-empty', 'No model loaded yet.'));
      return;
    }
    const table = content.appendChild(el('table', 'jp-ipylora-kv'));
    const rows: Array<[string, string]> = [
      ['id', m.id],
      ['dtype', m.dtype],
      ['quantization', m.quantization ?? 'none'],
      ['device', m.device],
      ['memory', m.memory]
    ];
    for (const [key, value] of rows) {
      const tr = table.appendChild(el('tr', ''));
      tr.appendChild(el('th', '', key));
      tr.appendChild(el('td', `jp-ipylora-model-${key}`, value));
    }
  }

  private _renderDatasets(state: ISessionState): void {
    const section = this._datasetSection;
    section.querySelector('.jp-ipylora-content')?.remove();
    const list = section.appendChild(el('ul', 'jp-ipylora-list jp-ipylora-content'));
    if (state.datasets.length === 0) {
      list.appendChild(el('li', 'jp-ipylora-empty', 'None yet: use %%lora_dataset.'));
    }
    for (const d of state.datasets) {
      const li = list.appendChild(el('li', ''));
      li.appendChild(el('span', 'jp-ipylora-name', d.name));
      li.appendChild(el('span', 'jp-ipylora-detail', `${d.rows} rows`));
    }
  }

  private _renderAdapters(state: ISessionState): void {
    const names = ['base', ...state.adapters.map(a => a.name)];
    const key = names.join('\u0000');
    const select = this._adapterSelect;
    if (key !== this._adapterKey && document.activeElement !== select) {
      this._adapterKey = key;
      select.replaceChildren(
        ...names.map(name => {
          const option = document.createElement('option');
          option.value = name;
          option.textContent = name === 'base' ? 'base (no adapter)' : name;
          return option;
        })
      );
    }
    if (document.activeElement !== select) {
      select.value = activeAdapter(state);
    }
    select.disabled = state.model === null;
    this._adapterList.replaceChildren(
      ...state.adapters.map(a => el('li', a.active ? 'jp-mod-active' : '', a.name))
    );
  }

  private _renderRun(run: IRunInfo | null): void {
    this._runSection.hidden = run === null;
    if (run === null) {
      this._stopping = false;
      return;
    }
    this._runSection.dataset.status = run.status;
    this._runName.textContent = `${run.name} — ${run.status}`;
    this._progress.max = Math.max(run.total, 1);
    this._progress.value = Math.min(run.step, run.total);
    const eta = run.status === 'running' ? ` · ETA ${formatDuration(run.eta_s)}` : '';
    this._runStats.textContent =
      `step ${run.step}/${run.total} · ${run.tokens_per_s.toFixed(0)} tokens/s` + eta;
    const line = sparkline(run.loss, SPARK_W, SPARK_H, 2);
    this._sparkPath.setAttribute('d', line.path);
    this._lossLabel.textContent =
      line.last === null
        ? 'loss —'
        : `loss ${line.last.toPrecision(4)} (min ${line.min?.toPrecision(4)}, max ${line.max?.toPrecision(4)})`;
    const running = run.status === 'running';
    if (!running) {
      this._stopping = false;
    }
    this._stop.hidden = !running;
    this._stop.disabled = !running || this._stopping;
    this._stop.textContent = this._stopping ? 'Stopping…' : 'Stop';
  }

  private _model: LoraModel;
  private _notebook: HTMLElement;
  private _message: HTMLElement;
  private _error: HTMLElement;
  private _body: HTMLElement;
  private _modelSection: HTMLElement;
  private _datasetSection: HTMLElement;
  private _adapterSelect: HTMLSelectElement;
  private _adapterList: HTMLElement;
  private _adapterKey = '';
  private _runSection: HTMLElement;
  private _runName: HTMLElement;
  private _progress: HTMLProgressElement;
  private _runStats: HTMLElement;
  private _spark: SVGSVGElement;
  private _sparkPath: SVGPathElement;
  private _lossLabel: HTMLElement;
  private _stop: HTMLButtonElement;
  private _stopping = false;
}
