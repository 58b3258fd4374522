/**
 * The `onthefly run` command line the extension starts (pure; no vscode import).
 * The CLI is `python -m onthefly_supervisor run [--automode] SCRIPT ARGS...`.
 */
import * as path from 'node:path';

/** A launch configuration of type "onthefly" (package.json documents every field). */
export interface OnTheFlyLaunchConfig {
  type: 'onthefly';
  request: 'launch';
  name: string;
  /** The training script (usually "${file}"). */
  program: string;
  args?: string[];
  /** Let the planner act on its own (`--automode`). */
  automode?: boolean;
  /** Run without the terminal UI (`--headless`). */
  headless?: boolean;
  /** Keep the supervisor alive after the work is done (`--keep-alive`). */
  keepAlive?: boolean;
  /** Working directory; the session folder goes to <cwd>/.onthefly. Default: the workspace folder. */
  cwd?: string;
  /** Python interpreter; default: the selected interpreter of the Python extension, else python3. */
  python?: string;
  env?: Record<string, string>;
}

export interface RunCommand {
  executable: string;
  args: string[];
  cwd: string;
  /** The script, absolute. */
  program: string;
}

/**
 * @param python the interpreter as a command prefix (e.g. ["/venv/bin/python"] or
 *   ["conda", "run", "-n", "x", "python"] from the Python extension).
 */
export function buildRunCommand(python: string[], cfg: Pick<OnTheFlyLaunchConfig, 'program' | 'args' | 'automode' | 'headless' | 'keepAlive' | 'cwd'>, defaultCwd: string): RunCommand {
  if (!python.length || !python[0]) throw new Error('no Python interpreter given');
  if (!cfg.program) throw new Error('the launch configuration needs "program" (the training script)');
  const cwd = cfg.cwd || defaultCwd;
  const program = path.isAbsolute(cfg.program) ? cfg.program : path.resolve(cwd, cfg.program);
  const flags: string[] = [];
  if (cfg.automode) flags.push('--automode');
  if (cfg.headless) flags.push('--headless');
  if (cfg.keepAlive) flags.push('--keep-alive');
  return {
    executable: python[0],
    args: [...python.slice(1), '-m', 'onthefly_supervisor', 'run', ...flags, program, ...(cfg.args ?? [])],
    cwd,
    program,
  };
}

/** POSIX-shell quoting, for showing the command to the user. */
export function shellQuote(arg: string): string {
  if (/^[A-Za-z0-9_@%+=:,./-]+$/.test(arg)) return arg;
  return `'${arg.replace(/'/g, `'\\''`)}'`;
}

export function describeCommand(c: RunCommand): string {
  return [c.executable, ...c.args].map(shellQuote).join(' ');
}

/** Where the supervisor of a workspace writes its connection file. */
export function connectionFileFor(workspaceDir: string): string {
  return path.join(workspaceDir, '.onthefly', 'sessions', 'latest', 'connection.json');
}
