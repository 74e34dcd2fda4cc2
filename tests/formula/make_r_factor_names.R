# lme4's names of the random factors, for tests/formula/test_factor_names_r.py.
#
#   Rscript tests/formula/make_r_factor_names.R      (run from the repository root)
#
# For each formula below, over tests/formula/r_factor_names_data.csv, records lme4's random
# terms in lme4's order (mkReTrms puts them by decreasing number of levels, `rev(order(nl))`,
# whenever they are not already so ordered): the grouping (names(cnms)), the effects
# (cnms), the number of levels (nl), and the factor's name as VarCorr gives it
# (names(VarCorr(fit)): make.names(..., unique = TRUE) when a grouping repeats), which
# is what summary() and as.data.frame(VarCorr(fit))$grp print.  Writes
# tests/formula/r_factor_names.json.
library(jsonlite)
suppressMessages(library(lme4))
folder <- "tests/formula"
d <- read.csv(file.path(folder, "r_factor_names_data.csv"))
set.seed(1)
d$y <- rnorm(nrow(d))
formulas <- c(
  "y ~ time + (1 | site) + (time || subject)",
  "y ~ time + (1 | subject) + (1 | site) + (0 + time | subject)",
  "y ~ time + (time || subject) + (1 | site)",
  "y ~ time + (1 | site) + (1 | scanner) + (time || subject)",
  "y ~ 1 + (1 | site) + (1 | scanner)",
  "y ~ time + (1 | site) + (time + age || site)",
  "y ~ time + (1 | grp) + (time || site) + (1 | site:grp)",
  "y ~ time + (time || site/subject)",
  "y ~ time + (1 | batch) + (1 | subject) + (0 + time | batch) + (1 | site)",
  "y ~ time + (1 | site) + (1 | batch) + (1 | subject) + (0 + time | batch)",
  "y ~ time + (age:time + time || subject) + (1 | site)",
  "y ~ time + (1 | grp) + (1 | site/subject) + (0 + time | subject:site)",
  "y ~ time + (1 | site/grp/subject) + (0 + time | site)",
  "y ~ time + (1 | site/grp) + (1 | grp)"
)
control <- lmerControl(check.nobs.vs.nRE = "ignore", check.nobs.vs.nlev = "ignore",
                       check.nobs.vs.rankZ = "ignore", check.conv.singular = "ignore",
                       calc.derivs = FALSE)
cases <- lapply(formulas, function(text) {
  f <- as.formula(text)
  re <- lFormula(f, d, control = control)$reTrms
  fit <- suppressWarnings(lmer(f, d, control = control))
  stopifnot(identical(names(getME(fit, "cnms")), names(re$cnms)))
  list(formula = text,
       factors = unname(lapply(seq_along(re$cnms), function(i)
         list(name = names(VarCorr(fit))[i], grouping = names(re$cnms)[i],
              effects = I(re$cnms[[i]]), levels = unname(re$nl[i])))))
})
# R's make.names and make.unique themselves, on names that stress them
groupings <- c("a:b", "a.b", "a.b", "g3:(g2:g1)", "_x", "if", ".1a", "a.b.1", "a.b", "TRUE",
               "x y", "subject", "subject")
repeats <- c("a", "a", "a.1", "a", "a.2")
make_names <- list(names = I(groupings), make_names = I(make.names(groupings)),
                   make_names_unique = I(make.names(groupings, unique = TRUE)),
                   repeats = I(repeats), make_unique = I(make.unique(repeats)))
ref <- list(note = "made by tests/formula/make_r_factor_names.R", cases = cases,
            make_names = make_names,
            R = R.version.string, lme4 = as.character(packageVersion("lme4")))
writeLines(toJSON(ref, auto_unbox = TRUE, digits = NA, pretty = TRUE),
           file.path(folder, "r_factor_names.json"))
