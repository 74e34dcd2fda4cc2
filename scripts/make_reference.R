# make_reference.R -- lme4 + lmerTest reference values for the datasets in tests/reference/.
#
# Run from the repository root (after python3 scripts/make_reference_data.py):
#     Rscript scripts/make_reference.R                 # every dataset
#     Rscript scripts/make_reference.R intercept slope # some of them
# Environment: MAKE_REFERENCE_CORES (default 2) voxels fitted in parallel (parallel::mclapply).
# Debian packages (bookworm): r-base-core r-cran-lme4 r-cran-lmertest r-cran-jsonlite
#     apt-get install r-cran-lme4 r-cran-lmertest r-cran-jsonlite
# Written with lme4 1.1-31, lmerTest 3.1-3, jsonlite 1.8.4 (R 4.2.2).
#
# For every dataset folder tests/reference/<name>/ it reads X.csv, factor_<f>.csv, Z_<f>.csv,
# Y.csv and dataset.json, and writes lme4_REML.json and lme4_ML.json (format:
# tests/reference/README.md).  Each voxel is fitted on its observed rows only with
#     y ~ 0 + X1 + ... + Xp + (0 + z_<f>_1 + ... + z_<f>_q | g_<f>) + ...
# so X and Z are used exactly as given.  lme4 is no oracle at the boundary, so every voxel is
# fitted with the default optimiser, with tight Nelder-Mead and with tight bobyqa; then
# Nelder-Mead and bobyqa are restarted from the best theta so far until a round gains less
# than 1e-9.  The fit with the highest log-likelihood is kept and lmerTest's Satterthwaite
# contrasts are computed on it.

suppressPackageStartupMessages({
  library(lme4)
  library(lmerTest)
  library(jsonlite)
  library(parallel)
})

ROOT <- "tests/reference"
CORES <- as.integer(Sys.getenv("MAKE_REFERENCE_CORES", "2"))

checks <- list(check.nobs.vs.nRE = "warning", check.nobs.vs.rankZ = "ignore",
               check.nlev.gtreq.5 = "ignore", check.rankX = "stop.deficient")
CONTROLS <- list(
  default = do.call(lmerControl, checks),
  Nelder_Mead = do.call(lmerControl, c(checks, list(
    optimizer = "Nelder_Mead",
    optCtrl = list(FtolAbs = 1e-12, FtolRel = 1e-12, maxfun = 1e5)))),
  bobyqa = do.call(lmerControl, c(checks, list(
    optimizer = "bobyqa", optCtrl = list(rhoend = 1e-10, maxfun = 1e5))))
)
POLISH <- do.call(lmerControl, c(checks, list(
  optimizer = "Nelder_Mead",
  optCtrl = list(FtolAbs = 1e-14, FtolRel = 1e-14, XtolRel = 1e-12, maxfun = 1e5))))
POLISH_BOBYQA <- do.call(lmerControl, c(checks, list(
  optimizer = "bobyqa", optCtrl = list(rhoend = 1e-11, maxfun = 1e5))))

read_matrix <- function(path) {
  m <- as.matrix(read.csv(path, header = FALSE, na.strings = c("NaN", "NA")))
  dimnames(m) <- NULL
  storage.mode(m) <- "double"
  m
}

load_dataset <- function(name) {
  dir <- file.path(ROOT, name)
  meta <- fromJSON(file.path(dir, "dataset.json"), simplifyVector = FALSE)
  X <- read_matrix(file.path(dir, "X.csv"))
  colnames(X) <- paste0("X", seq_len(ncol(X)))
  df <- as.data.frame(X)
  terms <- character()
  fnames <- vapply(meta$factors, function(f) f$name, "")
  for (f in meta$factors) {
    lab <- readLines(file.path(dir, paste0("factor_", f$name, ".csv")))
    Z <- read_matrix(file.path(dir, paste0("Z_", f$name, ".csv")))
    zn <- paste0("z_", f$name, "_", seq_len(ncol(Z)))
    for (j in seq_len(ncol(Z))) df[[zn[j]]] <- Z[, j]
    df[[paste0("g_", f$name)]] <- lab
    terms <- c(terms, sprintf("(0 + %s | g_%s)", paste(zn, collapse = " + "), f$name))
  }
  form <- as.formula(paste("y ~ 0 +", paste(colnames(X), collapse = " + "), "+",
                           paste(terms, collapse = " + ")))
  list(name = name, dir = dir, meta = meta, df = df, Y = read_matrix(file.path(dir, "Y.csv")),
       form = form, fnames = fnames, p = ncol(X))
}

# Fit one model, counting (and muffling) warnings; messages (singular fit) are muffled.
fit_counted <- function(form, d, REML, control, start = NULL) {
  nw <- 0L
  fit <- withCallingHandlers(
    tryCatch(lme4::lmer(form, data = d, REML = REML, control = control, start = start),
             error = function(e) NULL),
    warning = function(w) { nw <<- nw + 1L; invokeRestart("muffleWarning") },
    message = function(m) invokeRestart("muffleMessage"))
  list(fit = fit, warnings = nw, llh = if (is.null(fit)) -Inf else as.numeric(logLik(fit)))
}

# The fit of one voxel with one method: all optimisers, keep the best, lmerTest on it.
fit_voxel <- function(ds, j, REML) {
  d <- ds$df
  d$y <- ds$Y[, j]
  d <- d[!is.na(d$y), , drop = FALSE]
  for (f in ds$fnames) d[[paste0("g_", f)]] <- factor(d[[paste0("g_", f)]])
  form <- ds$form
  fits <- lapply(CONTROLS, function(ctrl) fit_counted(form, d, REML, ctrl))
  llh <- vapply(fits, function(r) r$llh, 0)
  best <- names(which.max(llh))
  if (!is.finite(llh[best])) return(NULL)
  nwarn <- sum(vapply(fits, function(r) r$warnings, 0L))
  # Polish: restart Nelder-Mead and bobyqa from the best theta so far, round after round,
  # until a round gains less than 1e-9 (at flat boundary optima one run stops short and a
  # restart of the other optimiser goes on).
  kept <- fits[[best]]
  kept_llh <- llh[[best]]
  polish_llh <- -Inf
  for (round in 1:6) {
    start <- list(theta = getME(kept$fit, "theta"))
    tries <- list(polish_Nelder_Mead = fit_counted(form, d, REML, POLISH, start = start),
                  polish_bobyqa = fit_counted(form, d, REML, POLISH_BOBYQA, start = start))
    nwarn <- nwarn + sum(vapply(tries, function(r) r$warnings, 0L))
    tl <- vapply(tries, function(r) r$llh, 0)
    polish_llh <- max(polish_llh, tl)
    gain <- max(tl) - kept_llh
    if (gain > 0) {
      best <- names(which.max(tl))
      kept <- tries[[best]]
      kept_llh <- max(tl)
    }
    if (gain < 1e-9) break
  }
  llh <- c(llh, polish = polish_llh)
  m <- kept$fit
  # lmerTest rebuilds the deviance function by evaluating the model's call, so evaluate it
  # where the call's variables (form, d, REML, control, start) exist.
  mt <- local({
    control <- POLISH
    start <- NULL
    suppressMessages(suppressWarnings(as_lmerModLmerTest(m)))
  })

  vc <- VarCorr(m)
  th <- getME(m, "theta")
  cov <- list()
  theta <- numeric()
  for (f in ds$fnames) {
    g <- paste0("g_", f)
    cm <- vc[[g]]
    attr(cm, "stddev") <- NULL
    attr(cm, "correlation") <- NULL
    cm <- matrix(as.numeric(cm), nrow(cm))
    cov[[f]] <- cm
    theta <- c(theta, th[startsWith(names(th), paste0(g, "."))])
  }
  contr <- list()
  for (cn in ds$meta$contrasts) {
    w <- cn$weights
    if (is.list(w[[1]])) {  # F: list of rows (a T contrast is one row of numbers)
      L <- do.call(rbind, lapply(w, function(r) as.numeric(unlist(r))))
      res <- suppressMessages(suppressWarnings(contestMD(mt, L, ddf = "Satterthwaite")))
      contr[[cn$name]] <- list(F = res[["F value"]], df_num = res[["NumDF"]],
                               df_den = res[["DenDF"]], p = res[["Pr(>F)"]])
    } else {
      L <- as.numeric(unlist(w))
      res <- suppressMessages(suppressWarnings(contest1D(mt, L, ddf = "Satterthwaite")))
      contr[[cn$name]] <- list(estimate = res[["Estimate"]], se = res[["Std. Error"]],
                               t = res[["t value"]], df = res[["df"]], p = res[["Pr(>|t|)"]])
    }
  }
  list(llh = as.numeric(logLik(m)), beta = unname(fixef(m)), sigma2 = sigma(m)^2,
       cov = cov, theta = unname(theta), singular = isSingular(m, tol = 1e-4),
       optimizer = best, n = nobs(m), warnings = nwarn,
       vcov_beta = unname(as.matrix(vcov(m))),
       llh_by_optimizer = as.list(llh), contrasts = contr)
}

# Assemble per-voxel results into the per-field layout of the JSON files.
assemble <- function(ds, res, method) {
  pick <- function(field) lapply(res, function(r) if (is.null(r)) NA else r[[field]])
  vec <- function(field) lapply(res, function(r) if (is.null(r)) NA else as.list(r[[field]]))
  out <- list(
    dataset = ds$name, method = method,
    lme4_version = as.character(packageVersion("lme4")),
    lmerTest_version = as.character(packageVersion("lmerTest")),
    llh = pick("llh"), beta = vec("beta"), sigma2 = pick("sigma2"),
    cov = setNames(lapply(ds$fnames, function(f)
      lapply(res, function(r) if (is.null(r)) NA else r$cov[[f]])), ds$fnames),
    theta = vec("theta"), singular = pick("singular"), optimizer = pick("optimizer"),
    n = pick("n"), warnings = pick("warnings"), vcov_beta = pick("vcov_beta"),
    llh_by_optimizer = setNames(lapply(c(names(CONTROLS), "polish"), function(o)
      lapply(res, function(r) if (is.null(r)) NA else r$llh_by_optimizer[[o]])),
      c(names(CONTROLS), "polish"))
  )
  contr <- list()
  for (cn in ds$meta$contrasts) {
    fields <- if (is.list(cn$weights[[1]])) c("F", "df_num", "df_den", "p") else
      c("estimate", "se", "t", "df", "p")
    contr[[cn$name]] <- setNames(lapply(fields, function(k)
      lapply(res, function(r) if (is.null(r)) NA else r$contrasts[[cn$name]][[k]])), fields)
  }
  out$contrasts <- contr
  out
}

run_dataset <- function(name) {
  ds <- load_dataset(name)
  v <- ncol(ds$Y)
  for (method in c("REML", "ML")) {
    t0 <- proc.time()[["elapsed"]]
    res <- mclapply(seq_len(v), function(j) {
      tryCatch(fit_voxel(ds, j, REML = method == "REML"), error = function(e) {
        message(sprintf("%s voxel %d %s: %s", name, j, method, conditionMessage(e)))
        NULL
      })
    }, mc.cores = CORES, mc.preschedule = FALSE)
    secs <- proc.time()[["elapsed"]] - t0
    out <- assemble(ds, res, method)
    write_json(out, file.path(ds$dir, paste0("lme4_", method, ".json")), digits = NA,
               auto_unbox = TRUE, na = "null", null = "null", pretty = FALSE)
    short <- vapply(res, function(r) if (is.null(r)) NA_real_ else
      max(unlist(r$llh_by_optimizer)) - r$llh_by_optimizer$default, 0)
    cat(sprintf("%-14s %-4s v=%d failed=%d singular=%d secs=%.1f default short by >1e-6: %d (max %.3g)\n",
                name, method, v, sum(vapply(res, is.null, TRUE)),
                sum(unlist(lapply(res, function(r) isTRUE(r$singular)))), secs,
                sum(short > 1e-6, na.rm = TRUE), max(c(0, short), na.rm = TRUE)))
  }
}

args <- commandArgs(trailingOnly = TRUE)
names <- if (length(args)) args else sort(list.dirs(ROOT, full.names = FALSE, recursive = FALSE))
names <- names[file.exists(file.path(ROOT, names, "dataset.json"))]
t_all <- proc.time()[["elapsed"]]
for (nm in names) run_dataset(nm)
cat(sprintf("total %.1f s\n", proc.time()[["elapsed"]] - t_all))
